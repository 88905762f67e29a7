"""Cost next to peft PROMPT_TUNING: step time, memory and inference ratios (`ratios`), and the SVGD source stage's
step time against the number of particles (`svgd_scaling`), and the shared prefix's step time against concatenation
on a grid of shapes (`shared_prefix`)."""
