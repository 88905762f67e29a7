"""Reports rendered from a suite's records: `page` writes RESULTS.md, with a MiniLM or a causal-LM suite's claim
sections (`minilm`, `causal`) built on shared helpers (`common`)."""
