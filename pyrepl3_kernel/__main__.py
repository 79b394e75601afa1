from .handoff import main

main()
