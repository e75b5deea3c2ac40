from finetune.cli.app import main

main()
