"""Distributed utilities: device and process-group setup, DTensor helpers."""
