"""The serving engine: settings, scheduler, model runner and its compiled programs, output
processing, speculative decoding."""
