"""The operator side: dead letters (list, show, replay, purge), queue inspection and the
management API client. `service.commands` parses options and prints; the work is here."""
