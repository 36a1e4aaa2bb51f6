"""What the command line, training and the server share: networks, the checkpoint format, sampling, images, zips."""
