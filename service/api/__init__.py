"""The HTTP boundary: typed dependencies and one router per resource."""
