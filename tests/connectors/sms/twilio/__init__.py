"""Twilio SMS connector tests."""
