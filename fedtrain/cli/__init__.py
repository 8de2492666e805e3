"""The operator's `fedtrain` command line (`main`) and the options the services' own
command groups share (`options`). Nothing here runs on a node or in the coordinator."""
