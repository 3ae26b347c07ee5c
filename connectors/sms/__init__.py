"""SMS connectors (Twilio, Vonage) and what they share: GSM-7/UCS-2 segmenting."""
