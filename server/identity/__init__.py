"""Who is calling and what they may do: passwords, tokens, users, sessions, channel rules."""
