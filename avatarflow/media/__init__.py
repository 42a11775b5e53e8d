"""Media a user hands us (portrait, audio, calendar) and the videos we get back: what a source may
name and how it is fetched, magic-byte sniffing, the portrait, audio and video checks."""
