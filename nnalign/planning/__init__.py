"""Planning: nnU-Net's fingerprint -> plan -> preprocess, with nnalign's teacher-aware planner."""
