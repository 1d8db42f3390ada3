"""Names of the batch columns shared by the env runner, the modules and the learner."""

OBS = "obs"  # [..., N, obs_dim] float
AVAIL = "avail_actions"  # [..., N, A] bool
PREV_ACTIONS = "prev_actions"  # [..., N] int, -1 at an episode start
STATE = "state"  # [..., S] float, global state for the critic
HIDDEN = "hidden"  # [R, N, H] recurrent state before the first step of a segment
RESETS = "resets"  # [R, T] bool, an episode starts at this step (recurrent state zeroed)
ACTIONS = "actions"  # [..., N] int
LOGP = "action_logp"  # [..., N] float, log-probability under the sampling policy
VF_PREDS = "vf_preds"  # [..., N] float, values under the sampling critic
ADVANTAGES = "advantages"  # [..., N] float
VALUE_TARGETS = "value_targets"  # [..., N] float
ACTIVE = "active"  # [..., N] bool, agent alive (more than the no-op available)
LOGITS = "action_dist_inputs"  # [..., N, A] masked logits
HIDDEN_OUT = "hidden_out"  # [B, N, (A,) H] recurrent state after one acting step
