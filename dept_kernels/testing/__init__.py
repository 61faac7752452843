"""Testing support shipped with the library: tolerances and the comparison that uses them."""
