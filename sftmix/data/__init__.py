"""The data, before stage 1: records in any supported format (`records`), converted to chat messages and
tokenized with response-only labels (`dataset`), optionally selected (`selection`), and the models that read them
(`models`)."""
