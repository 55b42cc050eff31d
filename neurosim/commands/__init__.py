"""The CLI's subcommands, one module each (thin: parse, call the library, print)."""
