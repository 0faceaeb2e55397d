"""RoPE's Triton kernel (its torch formulation is ``fsa_train.model.rope.Rotary``)."""
