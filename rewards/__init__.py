"""Image(-text) reward models behind one interface (registered via ``calibri_register_rewards``)."""
