"""Raw data: BraTS release conversion, synthetic BraTS-like cases, label conventions and splits."""
