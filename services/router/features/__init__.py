"""What a request may ask for beyond text: tools and tool-call parsing, reasoning, structured outputs, images."""
