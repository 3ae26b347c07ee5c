"""Voice connectors: call flows (TwiML/NCCO) and call events."""
