package lifecycle

// MachinesByImage returns how many jobs of each image have a machine on
// this host or are building one, for the worker's metrics and its record
// in the host registry.
func (m *Manager) MachinesByImage() map[string]int {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make(map[string]int, len(m.jobs))
	for _, j := range m.jobs {
		out[j.image]++
	}
	return out
}
