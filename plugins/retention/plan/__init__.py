"""Plans: what a rule would purge, as a value, and the limits it is checked against."""
