"""`fedtrain demo`: a coordinator and three node processes on this machine (``launch``),
running the tabular demo (``tabular``) or the text fine-tuning demo (``text``)."""
