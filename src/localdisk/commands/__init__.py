"""The CLI's subcommands, one module per group; `localdisk.cli` assembles them."""
