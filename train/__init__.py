"""``python -m train``: fine-tune FLUX.1 Kontext into an Edit2Perceive perceiver (E2P-SPEC §4).

Read top-down:

* ``config``     -- every setting, from a YAML/JSON file and/or flags (``python -m train --help``);
* ``data``       -- dataset readers and the ratio-mixing batch sampler (the training-sample contract);
* ``batches``    -- the endless, resumable micro-batch stream (one number, the data position, resumes it);
* ``noise``      -- fixed-seed training noise and annealed multi-resolution noise;
* ``objective``  -- grid timesteps, bell weight, the rectified path, L_FM, the clean estimate, the adaptive λ;
* ``losses``     -- the pixel-space consistency losses (the paper's and the released code's);
* ``step``       -- one training forward in the inference token layout;
* ``model``      -- the trainable DiT (reference LoRA via peft, or full) and the kohya / BFL exports;
* ``checkpoint`` -- kill-safe checkpoints and resume;
* ``validation`` -- ``e2p_core.pipeline.perceive`` + ``e2p_core.metrics`` on held-out samples;
* ``trainer``    -- the accelerate loop that ties them together; ``cli`` -- the command line.

The Edit2Perceive math shared with inference (schedule, tokens, time embedding, targets, alignment, filters) is
imported from ``e2p_core``, never copied.
"""
