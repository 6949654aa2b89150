"""The local dev stack (`postlane dev`): Temporal binaries, the SMTP catcher and its strict
wire checker. Not used by production workers."""
