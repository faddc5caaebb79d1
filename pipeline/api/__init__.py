"""``plantstream serve``: REST, a live stream and a web page over the aggregate and alert data."""
