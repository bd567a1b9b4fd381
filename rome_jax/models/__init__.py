"""Model families (GPT-2, GPT-J) as pure functions over params pytrees."""
