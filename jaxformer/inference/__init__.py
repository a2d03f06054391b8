"""Using trained runs: sampling (the sample app), test-time evaluation and selection metrics
(the evaluate app), sentence embeddings (embed), attention maps (inspect)."""
