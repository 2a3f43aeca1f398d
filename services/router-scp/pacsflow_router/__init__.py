"""The pacsflow router-scp service: a C-STORE SCP that routes by called AE title and detects complete studies."""
