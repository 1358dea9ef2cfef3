"""The names this plugin registers with transformers and its requirement (a leaf module: every other module
of the plugin may import it, it imports none of them)."""

NAME = "accel_sigmoid"  # attn_implementation
EXPERTS_NAME = "accel"  # experts_implementation
REQUIRES = ("transformers>=5",)
