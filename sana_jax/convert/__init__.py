"""Checkpoint converters: name-mapping tables from official formats to our parameter trees."""
