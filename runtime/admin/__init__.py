"""The admin console: a researcher's or operator's way into a running study, over mutual TLS."""
