"""The top floor: the bots an admin defines, the commands, prompts, and the daemon that runs them."""
