"""Postlane's activities: every side effect (SMTP, later IMAP and templates) lives here."""
