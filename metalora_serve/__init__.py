"""The top of the stack: the `metalora` command, composed from the layers below it."""
