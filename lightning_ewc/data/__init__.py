"""The app's data: task streams built from standard datasets read straight into tensors."""
