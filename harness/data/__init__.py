"""Problems and what is known about them: the synthetic generator, GSM8K loading, answers, the
word-level tokenizer of the shipped models. Imports no other layer."""
