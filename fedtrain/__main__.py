from fedtrain.cli import main

main()
