"""Lanes (sending accounts): their wire models and the limits the server enforces per lane."""
