"""Route modules; each one only translates HTTP to the inner code and back."""
