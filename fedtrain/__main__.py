from fedtrain.cli.main import main

main()
