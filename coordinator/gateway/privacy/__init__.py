"""Privacy-aware routing: sensitive prompts go only to nodes of the classes allowed for them."""
