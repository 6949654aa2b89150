"""Inbound mail: classifying a message (`classify`), the watcher's wire models and starting
the inbox watchers (`inboxes`)."""
