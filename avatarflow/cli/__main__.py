from avatarflow.cli.root import main

main()
