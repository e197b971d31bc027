"""Plugins shipped with calibri (objectives and problem families), each registering through hooks."""
