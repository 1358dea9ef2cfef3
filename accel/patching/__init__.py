"""``accel.patch(model)``: swap accel's kernels into a model per instance, with a report.

Built-in rules cover torch.nn modules; plugins (entry-point group ``accel.plugins``) add
third-party model families. Importing this package does not load the native extension.
"""
from accel.patching.builtin import SigmoidAttentionAdapter, sigmoid_attention_rule
from accel.patching.core import PatchWarning, active_rules, patch, unpatch, unwrap
from accel.patching.plugins import Plugin, PluginStatus, list_plugins, unmet_requirement
from accel.patching.report import MethodPatched, PatchReport, Replaced, Skipped
from accel.patching.rules import Rule, bind_method, register_rule, registered_rules, unregister_rule

__all__ = [
    "patch", "unpatch", "unwrap", "PatchReport", "Replaced", "MethodPatched", "Skipped", "PatchWarning",
    "Rule", "register_rule", "unregister_rule", "registered_rules", "active_rules", "bind_method",
    "Plugin", "PluginStatus", "list_plugins", "unmet_requirement",
    "sigmoid_attention_rule", "SigmoidAttentionAdapter",
]
