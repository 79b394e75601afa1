from .gateway.standalone import main

main()
