"""The Flower ClientApp: local training and evaluation for every strategy."""
