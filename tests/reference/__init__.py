"""An independent PyTorch reference of the CAST math, used only by the tests."""
