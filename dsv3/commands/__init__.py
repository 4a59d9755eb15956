"""One module per `dsv3` verb; see `dsv3.cli`."""
