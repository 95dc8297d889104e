"""Flower server side: the strategy composing a method, reply checks, central DP,
the ServerApp, wire keys."""
